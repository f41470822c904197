"""The router: OpenAI API, admission, placement and membership (the control plane)."""
