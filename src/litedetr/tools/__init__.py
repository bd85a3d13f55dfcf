"""User-facing tools built on the models, data and engine layers; each backs one CLI command."""
