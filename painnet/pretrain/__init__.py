"""Self-supervised pretraining of the ConvAttn backbone (``experiment=pretrain``).

- :mod:`painnet.pretrain.data`: which runs a pretraining job may read (:class:`PretrainSplit`:
  never a held-out session of the participant being decoded) and the DataModule that serves
  their windows, labelled or not (rest runs).
- :mod:`painnet.pretrain.task`: masked-parcel / masked-frame reconstruction of z-scored windows
  with the ConvAttn net plus a small reconstruction head; its checkpoint's ``net.*`` weights
  load into a :class:`painnet.task.PainDecoderTask` for fine-tuning (``finetune.from``).
"""
