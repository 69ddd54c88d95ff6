"""The bundled demo model: a tiny llama that knows a few conversations by heart."""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
