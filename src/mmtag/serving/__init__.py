"""`mmtag serve`: the HTTP tagging service and its page. Imports inference; only the CLI
imports this package."""
