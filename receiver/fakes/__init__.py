"""Faithful local stand-ins for the services the receiver talks to, for tests and demos.

Each fake is a Starlette app served for real (`server.serve_in_thread`), records what it
received, and fails on demand, so tests exercise the real HTTP clients end to end.
"""
