"""Train one pain decoder on one split, or run an experiment (same as ``painnet-train``).

    python train.py                                   # ConvAttn on the simulated demo dataset
    python train.py data=demo model=edge_pcr          # the reference study's model, same split
    python train.py experiment=within_subject 'study.models=[ridge,convattn]'

See painnet/train.py; the configs live in painnet/conf.
"""

from painnet.train import main

if __name__ == "__main__":
    main()
