"""The HTTP contract without Flask: request and answer bodies, the feedback schemas, API tokens,
the per-request record and the OpenAPI document. `gateway.sdk` stands on it alone.
"""
