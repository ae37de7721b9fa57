"""The paper's setup: marginNCE on the EZ-VSL towers (docs/protocol.md sections 2-4).

Every experiment config imports this file and overrides a few fields; see each docstring.

    sslocal prepare --dataset vggsound/144k --root /data/vggsound
    sslocal train --config configs/default.py --workdir runs/default
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data: TFDS "name/config" strings (sslocal prepare builds them; data_dir is where they live).
    config.train_dataset = "vggsound/144k"
    config.test_datasets = ("vggss/test",)  # the first one picks the best checkpoint
    config.data_dir = "~/tensorflow_datasets"
    config.data_root = ""  # raw clips of the training set; built on first use when given
    config.image_size = 224
    config.worker_count = 0  # Grain worker processes per host (0: in the main process)

    # Model (section 2). The image tower starts from torchvision's ImageNet ResNet18.
    config.model = ml_collections.ConfigDict()
    config.model.width = 64
    config.model.embed_dim = 512
    config.model.audio_pool = 1  # > 1: average-pool spectrograms first (CPU demos; not the paper)
    config.model.image_stride = 32  # 16: a 2x finer response map (small frames; not the paper)
    config.model.dtype = "float32"  # or "bfloat16": towers in bf16, params and loss in float32
    config.model.image_pretrained = "~/.cache/sslocal/resnet18-f37072fd.pth"

    # Loss (section 3).
    config.loss = "marginnce"  # marginnce | lvs | ezvsl
    config.margin = -0.2
    config.tau = 0.07
    config.epsilon = 0.65
    config.epsilon2 = 0.4
    config.beta = 0.03

    # Optimisation (section 4).
    config.learning_rate = 1e-4
    config.lr_schedule = "constant"  # the paper; or "cosine" (warm-up, then decay to 0)
    config.warmup_steps = 0  # cosine: linear warm-up from 0 over these steps
    config.weight_decay = 1e-4
    config.batch_size = 128  # global, across all devices and hosts
    config.num_epochs = 20
    config.max_steps = -1  # > 0 stops early (smoke runs)

    # Evaluation (sections 5-6) and bookkeeping.
    config.eval_batch_size = 128
    config.eval_every_epochs = 1
    config.eval = ml_collections.ConfigDict()
    config.eval.ogl = False
    config.eval.ogl_weights = "~/.cache/sslocal/resnet18-f37072fd.pth"
    config.eval.ogl_alpha = 0.4
    config.eval.ogl_fusion = "minmax"  # minmax (EZ-VSL, reference) | slavc (fixed ranges)
    config.eval.threshold = "median_ge"  # median_ge (reference) | median_gt | adaptive | a number
    # bilinear_align_corners (reference) | bilinear | bicubic | bicubic_align_corners (SLAVC)
    config.eval.upsample = "bilinear_align_corners"
    config.eval.extended = "slavc"  # *_plus_silent sets: slavc (SLAVC's evaluator) | exact
    config.eval.ids_file = ""  # a list of clip ids: evaluate on that subset of each test set
    config.eval.report = False
    config.eval.baselines = False  # also score centre / random / oracle maps, untrained model
    # The benchmarks since 2023 (docs/protocol.md section 9). IS3 (iIoU / iAUC, the adaptive
    # threshold) and AVSBench (mask mIoU / F) are scored whenever they are test sets; these
    # add passes to every test set:
    config.eval.negative_audio = ()  # any of "silence", "noise", "offscreen": pIA and AOC
    config.eval.negative_threshold = "positive"  # positive (eval.threshold on each image's own
    #   map) | a number on the raw map (vssl_eval's --threshold)
    config.eval.retrieval = False  # audio <-> image recall@1/5/10 (pooled V_i and A_i)
    config.eval.retrieval_pooling = "mean"  # mean | max: how V_i is pooled over positions
    config.eval.mask_threshold = "median_gt"  # AVSBench masks: SSLalignment's map > median
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2
    return config
