"""
The names and grids that the model, the command line, the trainer and the server share, in one torch-free module:
importing it costs nothing, and a checkpoint carries it as remote code with the model files.
"""

PROG = "hf-fastbert"  # the command line

EXIT_RULES = ("entropy", "patience", "thresholds", "learned")  # see exit_rules.py
# Sentence embedding models: how the last layer's token states become the embedding (sentence-transformers' names).
POOLING_MODES = ("mean", "cls", "max")

# The grid of speeds that training reports and `sweep` measures, and the finer one that calibration searches.
DEFAULT_SPEEDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATION_SPEEDS = tuple(round(0.01 * i, 2) for i in range(100))  # 0.00 .. 0.99
EVALUATE_SPEEDS = (0.0, 0.1, 0.3, 0.5, 0.8)  # `hf-fastbert evaluate`'s default: a quick look

# Result tables: one row per speed, per exit rule, per student.
RESULT_COLUMNS = ("speed", "accuracy", "mean_exit_layer", "flops_speedup")
SUMMARY_COLUMNS = ("exit_rule", "speed", "accuracy", "flops_speedup", "oracle_fraction")
STUDENT_COLUMNS = ("layer", "accuracy", "agreement", "kl")

# Sentence embedding models: the speeds that training reports (the consecutive-layer cosine moves in thousandths).
EMBEDDING_SPEEDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
# The embedding heads' epoch budget: on cached states an epoch costs seconds, and R8's heads converged after about 14
# epochs (benchmarks/results/embedding_model_r8_epochs30_rounds1.md); 10 stopped them still improving.
EMBEDDING_MAX_EPOCHS = 30.0
EMBEDDING_COLUMNS = ("speed", "cosine", "overlap", "precision", "mean_exit_layer", "flops_speedup")

# Files in a trained model's folder.
RESULTS_FILENAME = "speed_results.json"  # the final sweep of `train`: speeds, students, notes
EMBEDDING_RESULTS_FILENAME = "embedding_results.json"  # `train-embedding`'s quality per speed
SWEEP_FILENAME = "sweep/sweep.json"  # `hf-fastbert sweep MODEL`'s default output
# Written last into every finished `train` output: its files and their SHA-256. A folder holding these files and
# nothing else is a previous run that a new one may replace; a folder without it is never replaced unless asked.
RUN_MANIFEST = "training_run.json"

# Training defaults, measured (README, "Benchmark: many classes"; docs/training.md).
FINETUNE_MAX_EPOCHS = 10.0  # stage 2's budget when fine-tuning until the held-out loss stops improving
FINETUNE_PATIENCE = 1
# The students are small, freshly initialised heads; the paper's 2e-4 (sized for its BERT-base setting) left them far
# from the teacher on 20 classes.
DISTILL_LEARNING_RATE = 1e-3
# Stage 3's budget when distilling until the students' held-out KL stops improving. On cached states an epoch costs
# the students alone: 10 ran out on Reuters R52 with the KL still falling, 30 converged there (13 epochs) for 1.12x the
# speed-up within 1 point, and changed nothing measurable where 10 sufficed (benchmarks/README.md).
DISTILL_MAX_EPOCHS = 30.0
DISTILL_PATIENCE = 2
DISTILL_MIN_IMPROVEMENT = 0.01  # relative decrease of the held-out KL that counts as progress
HELD_OUT_FRACTION = 0.1
# The default speed a trained model is saved with: the largest one whose accuracy on the calibration data stays within
# half an accuracy point of full depth.
MAX_ACCURACY_DROP = 0.005
