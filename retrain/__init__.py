"""Retraining: the reward model, PPO rounds against it, the gate, and the scheduler that runs them.

Nothing is imported at package level (the training modules pull in torch): import the module
you need, e.g. `from retrain.reward import load_reward_model`.
"""
