"""Thin HTTP handlers: parse, call a service, shape the response."""
