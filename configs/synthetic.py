"""The embedded default: marginNCE on procedural audio-visual scenes, on a laptop CPU.

    sslocal train --config configs/synthetic.py --workdir runs/demo

builds the synthetic dataset (data/synthetic.py, preset "demo": 8,192 training and 512 test
scenes, 16 categories, 112 x 112 frames, real 3 s WAV audio -> 257 x 200 spectrograms) through
the same TFDS / Grain path as VGGSound, trains, evaluates and writes report.html.

Why it differs from the paper: 112 px frames with the image tower's last stage at stride 16
give a 7 x 7 response map (stride 32 would give 4 x 4, too coarse to localize well); the
spectrogram is average-pooled 2 x 2 before the audio tower (4x cheaper); narrow towers (width 16,
D 128) trained from scratch (no ImageNet weights exist for synthetic scenes); a larger learning
rate with warm-up and a cosine decay, and a smaller batch, for the short budget.

Differs from default.py in: train_dataset, test_datasets, image_size, model.width,
model.embed_dim, model.image_pretrained, model.image_stride, model.audio_pool, batch_size,
eval_batch_size, learning_rate, lr_schedule, warmup_steps, num_epochs, log_every_steps,
checkpoint_every_steps, eval.report, eval.baselines.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.train_dataset = "synthetic_av/demo"
    config.test_datasets = ("synthetic_av/demo",)
    config.image_size = 112
    config.model.width = 16
    config.model.embed_dim = 128
    config.model.image_pretrained = ""
    config.model.image_stride = 16  # a 7 x 7 map from 112 px frames
    config.model.audio_pool = 2  # 129 x 100 spectrograms: the audio tower costs 4x less
    config.batch_size = 64
    config.eval_batch_size = 64
    # Chosen on 512 held-out validation scenes (README, "What it gives"), not the test split,
    # by the worst of 3 seeds: 8,192 training scenes for 5 epochs beat 4,096 for 10 (the same
    # steps), and 3e-3 after 128 steps of warm-up beat 1e-3 without, 2e-3 and 5e-3.
    config.learning_rate = 3e-3
    # Cosine decay to 0 over the run: the last epoch is the best and stable (a constant rate
    # left the last epochs swinging by several points from one processor to another).
    config.lr_schedule = "cosine"
    config.warmup_steps = 128  # the first epoch
    config.num_epochs = 5  # 640 steps of 64
    config.log_every_steps = 16
    config.checkpoint_every_steps = 64
    config.eval.report = True
    config.eval.baselines = True
    return config
