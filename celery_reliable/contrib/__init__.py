"""Integrations with other frameworks; each is imported only when you import it."""
