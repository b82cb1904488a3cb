"""Where explicit rewards come from: reward sources that turn (prompt, response) pairs into scores.

Each source returns one float per response and can write a canonical K-response reward dataset
(`prompt, responses, rewards`) that `nca_kit.train` and the notebooks accept unchanged.

- `nca_kit.rewards.embedding` — embedding-based reward models (Sun, Shen & Ton, ICLR 2025) on frozen embeddings,
  with `annotate` (simulated annotators) and `heads` (Bradley–Terry and classification heads);
  `learned_reward_dataset` re-scores a reward dataset with a head fitted on its own rewards in one call.
- `nca_kit.rewards.followup` — Follow-up Likelihood as Reward (Zhang et al., AAAI 2025) and its Direct baseline,
  with `followup_texts` (the follow-up sentences and their tokens).
- `nca_kit.rewards.metrics` — the metrics every source and study is measured with; `studies` — the studies of
  notebooks 10 and 11.
"""
