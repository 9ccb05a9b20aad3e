"""Training text memory networks on bAbI with JAX and optax: ``train.train_task`` is the
entry point (``memnet train``); ``fit`` holds the objective and the jitted step."""
