"""Data: readers for the user's text, the built-in offline corpus, token shards and loaders."""
