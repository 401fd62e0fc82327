"""One app with one model, written by the tasks under test."""
