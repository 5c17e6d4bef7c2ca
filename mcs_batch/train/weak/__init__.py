"""Weakly supervised retraining (METHOD.md): zero-shot masks of a segmentation run become pseudo-labels
for an nnU-Net v2 checkpoint ensemble trained on Ray Train, which then refines the masks.

    select.py      which (case, slice) pseudo-labels are used, and why others are not (pure)
    export.py      the nnU-Net raw dataset (imagesTr / labelsTr / dataset.json) and its mapping file
    nnunet_env.py  the one place nnU-Net's environment variables are made
    schedule.py    the cyclic learning rate and which epochs are ensemble checkpoints (pure)
    loop.py        the Ray Train worker: one ensemble member per worker, checkpoints, resume
    train.py       `train_weak`: selection -> export -> plan/preprocess -> TorchTrainer -> ensemble
    uncertainty.py mean probability, threshold, uncertainty scores (pure)
    refine.py      `refine`: the ensemble over a run's cases as a Ray Data actor pool -> <target>@weak
    trigger.py     `submit_after_segment`: a segmentation job hands its OUT to retraining
"""
