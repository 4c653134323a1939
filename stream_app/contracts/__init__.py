"""What goes over the wire: pydantic models of every topic's value, the one decoder of input
bytes, and the JSON Schema generation that publishes them in `schemas/`. Imports nothing else
of stream_app but settings and errors."""
