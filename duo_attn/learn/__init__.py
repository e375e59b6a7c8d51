"""Learning a pattern: synthetic passkey samples (`data`) in filler text (`haystack`), gate training by distillation
(`train`), the training-free head score (`scoring`), and what their runs share (`run`, `checkpoint`)."""
