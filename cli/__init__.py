"""The processes and operator commands: `python -m cli serve|project|rebuild|verify|replay|
reproduce|erase` (the Justfile's recipes call these), and the supervisor that runs the projection
worker as a child of `serve`. The outermost room: may import every other; nothing imports it.
"""
