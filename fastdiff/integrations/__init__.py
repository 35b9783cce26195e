"""fastdiff inside other libraries' pipelines. Each integration is a subpackage that only the
public face (``fastdiff/__init__.py``) imports; the core (ops, schedules, capture, engine)
imports none of them."""
