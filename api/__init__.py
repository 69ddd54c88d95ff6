"""The HTTP face: Anthropic Messages and OpenAI Chat Completions, translated to and from the engine."""
