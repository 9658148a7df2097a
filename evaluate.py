"""Predict and score the held-out sessions of a trained model (same as ``painnet-evaluate``).

    python evaluate.py run_dir=outputs/train/2026-11-25/10-00-00

See painnet/evaluate.py; the configs live in painnet/conf.
"""

from painnet.evaluate import main

if __name__ == "__main__":
    main()
