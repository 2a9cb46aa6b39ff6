"""Post-training the V4 way: SFT, GRPO specialists on verifiable environments, multi-teacher on-policy
distillation (student samples, full-vocabulary reverse KL to each prompt's domain teacher), and a generative
reward model for tasks rules cannot check. Rollouts run on the serving engine."""
