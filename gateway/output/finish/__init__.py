"""Constrained answers that finish within their token budget.

A grammar keeps a small model's JSON valid token by token, but not finished: a string that
never closes, one more array item, one more key, until ``max_tokens`` cuts it and the client
raises. This package follows what a sequence has written and, when what is left of its budget
comes close to the shortest way to finish, hands the engine a narrower grammar for the rest:
the open string must close within a few characters, no optional key or array item beyond
what the schema requires may start, numbers are short. The model still writes every value;
the grammar only takes away the ways that run past the budget.

- :mod:`~gateway.output.finish.schemas`: a JSON schema navigated as the finisher needs it
  (the shortest value, the narrowed grammar of a value).
- :mod:`~gateway.output.finish.tracker`: where the JSON written so far stands (open objects,
  arrays, the scalar being written).
- :mod:`~gateway.output.finish.closing`: from that state, the shortest finish and the narrowed
  grammar for the rest.
- :mod:`~gateway.output.finish.envelope`: where the JSON sits in the output (the answer, or a
  tool call between its markers) and what must follow it.
- :mod:`~gateway.output.finish.steering`: one sequence's budget, watched token by token.
"""
