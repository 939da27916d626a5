"""Running the learner on Ray: Train workers, checkpoints, job submission."""
