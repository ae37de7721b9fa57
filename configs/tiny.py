"""The tiny model and data that tests and benchmarks build on (not an experiment).

synthetic_av/tiny (64 x 64 scenes, built in seconds) with the demo's architecture (image map at
stride 16, spectrograms pooled 2 x 2) at width 8 and D 16, batches of 8, no report and no
baselines: every step compiles and runs in seconds on a CPU. Tests override what they vary.

Differs from default.py in: train_dataset, test_datasets, image_size, model.width,
model.embed_dim, model.image_pretrained, model.image_stride, model.audio_pool, batch_size,
eval_batch_size, learning_rate, num_epochs, log_every_steps, checkpoint_every_steps.
"""

from configs import synthetic


def get_config():
    config = synthetic.get_config()
    config.train_dataset = "synthetic_av/tiny"
    config.test_datasets = ("synthetic_av/tiny",)
    config.image_size = 64
    config.model.width = 8
    config.model.embed_dim = 16
    config.batch_size = 8
    config.eval_batch_size = 8
    config.eval.report = False
    config.eval.baselines = False
    config.lr_schedule = "constant"  # the paper's optimizer: tests build it without a run length
    config.warmup_steps = 0
    # The demo's values before it moved to 8,192 scenes; the tests were written against them.
    config.learning_rate = 1e-3
    config.num_epochs = 10
    return config
