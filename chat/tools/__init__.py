"""The office model's tools: built-in, offline, each bounded, and their arguments validated."""
