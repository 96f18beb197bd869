"""Front ends over the decode runtime: chat prompts and the OpenAI-compatible HTTP server.

prompt.py (chat messages -> prompt tokens, the model's template or a plain fallback, history
trimmed to the context) needs only the runtime and a tokenizer: `moecarve chat` uses it too.
protocol.py (request validation, OpenAI-shaped responses and errors) and app.py (the ASGI app over
one Engine) need the `serve` extra (starlette, uvicorn): import them as submodules, never from
here, so that a base install can still chat.
"""
