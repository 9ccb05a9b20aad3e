"""The streaming worker: Redis Streams in, memnet engine in the middle, responses out.

This package imports ``memnet``; ``memnet`` never imports it.
"""
