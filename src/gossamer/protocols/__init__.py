"""One pure state machine per execution pattern, and the upload pipeline.

A protocol consumes events (a client asks for work, an upload arrives, a timer fires) and
emits actions (train these nodes from this start, aggregate, record a row). It knows no
clock, no transport and no storage of the population: executors (``sim/drivers``,
``runtime/``) feed it events and carry out its actions. See docs/development.md.
"""
