"""The AI gateway: an OpenAI- and Anthropic-compatible API in front of model groups (see
docs/llm.md). The LLM API is one kind of route handler on the data plane."""
