"""Using a trained reward model: model folders, batch scoring (``zreward score`` / ``rank``), the HTTP reward
service (``zreward serve``) and the reward-function adapters RL trainers call."""
