"""Learning a pattern: the synthetic passkey data (`data`), gate training by distillation (`train`), the
training-free head score (`scoring`), and what their runs share (`run`, `checkpoint`)."""
