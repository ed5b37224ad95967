"""fdngx: nginx in front of data-parallel LLM servers, weighted by their real load."""

__version__ = "0.3.0"
