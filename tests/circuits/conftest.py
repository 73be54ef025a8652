"""Circuit tests: fixtures of their own live in the test modules; one torch thread comes from
the top-level conftest."""
