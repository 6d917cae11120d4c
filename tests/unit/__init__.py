"""The unit tier (`make test-fast`): tests that run inside the pytest process, in seconds.

A package, so that its conftest.py and test modules do not share module names with tests/'s.
"""
