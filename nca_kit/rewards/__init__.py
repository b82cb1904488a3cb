"""Where explicit rewards come from: reward sources that turn (prompt, response) pairs into scores.

Each source module returns one float per response and can write a canonical K-response reward dataset
(`prompt, responses, rewards`) that `nca_kit.train` and the notebooks accept unchanged.

- `nca_kit.rewards.embedding` — embedding-based reward models (Sun, Shen & Ton, ICLR 2025): Bradley–Terry and
  classification heads on frozen embeddings, simulated annotators, order-consistency metrics;
  `learned_reward_dataset` re-scores a reward dataset with a head fitted on its own rewards in one call.
- `nca_kit.rewards.followup` — Follow-up Likelihood as Reward (Zhang et al., AAAI 2025) and its Direct baseline.
"""
