"""Test package (lets test modules share helpers, e.g. ``from tests.stack_fixture import local_stack``)."""
