"""gpt_lightning's Hydra plugins (Hydra only instantiates plugins from the `hydra_plugins` namespace package)."""
