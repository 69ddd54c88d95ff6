"""The lines that point Claude Code and Codex CLI at this server: its address, key and context window filled in."""

# Codex compacts a conversation once it holds this share of the context window.
CODEX_COMPACT_SHARE = 7 / 8


def client_setup(url: str, api_key: str | None, context_window: int) -> str:
    """Claude Code's environment variables and a Codex profile for this server, ready to paste."""
    codex = [
        'model_provider = "mlx-tui"',
        'model = "mlx-tui"',
        f"model_context_window = {context_window}",
        f"model_auto_compact_token_limit = {int(context_window * CODEX_COMPACT_SHARE)}",
        "[model_providers.mlx-tui]",
        'name = "mlx-tui"',
        f'base_url = "{url}/v1"',
        'wire_api = "responses"',
    ]
    if api_key:
        codex.append('env_key = "MLX_TUI_API_KEY"')
    key = f"export MLX_TUI_API_KEY={api_key}, " if api_key else ""
    return "\n".join(
        [
            "Claude Code:",
            f"  export ANTHROPIC_BASE_URL={url} ANTHROPIC_API_KEY={api_key or 'not-needed'} "
            f"CLAUDE_CODE_AUTO_COMPACT_WINDOW={context_window}",
            f"Codex CLI: {key}put these lines in ~/.codex/mlx-tui.config.toml, run `codex --profile mlx-tui`",
            *("  " + line for line in codex),
        ]
    )
