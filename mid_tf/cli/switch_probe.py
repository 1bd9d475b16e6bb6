"""`python -m mid_tf.cli.switch_probe`: does a run's regeneration lose its PSNR in the features or in the switches?

  python -m mid_tf.cli.switch_probe --model_dir=runs/mnist_whitebox --data_dir=../shared/data/mnist \
      --examples=1000 --attack=pgd40

Crafts `--attack` on the run's target (the transfer protocol of the eval stage's regeneration rows) for the first
`--examples` test images, then decodes features and pooling switches of the teacher E_t and the student E_s, clean
and attacked, in every pairing of evaluation/switches.py, and prints PSNR / SSIM against the clean images as a
Markdown table (with --out, also as JSON). The run needs stages target, teacher and mid done; LeNet family only
(the ResNet decoder has no switches).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from mid_tf.cli.common import fail, parse_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "A run's model_dir with stages target, teacher and mid done.")
flags.DEFINE_string("data_dir", None, "Where the run's dataset is (as for train.py).")
flags.DEFINE_integer("examples", 1000, "The first N test images.")
flags.DEFINE_string("attack", "pgd40", "The attack crafted on the target (a registry name, docs/attacks.md).")
flags.DEFINE_enum("decoder", "teacher", ["teacher", "student"], "Decode with D_t (teacher) or stage regen's D_s.")
flags.DEFINE_integer("seed", 0, "Seed of the attack's random starts.")
flags.DEFINE_string("out", None, "Also write the rows to this JSON file.")


def main(argv) -> int:
    if len(argv) > 1:
        return fail(f"unexpected arguments {argv[1:]}; every input is a flag")
    if not FLAGS.model_dir or FLAGS.examples < 1:
        return fail("give --model_dir (a run with stages target, teacher and mid done) and --examples >= 1")
    from mid_tf import artifacts
    from mid_tf.attacks.registry import threat_model, threat_model_for
    from mid_tf.data import DataError, load_split
    from mid_tf.evaluation import switches
    from mid_tf.evaluation.robustness import craft
    from mid_tf.models import family_for, lenet

    try:
        identity = artifacts.read_run_identity(FLAGS.model_dir)
        models = artifacts.load_models(FLAGS.model_dir)
        if family_for(identity["dataset"], identity.get("input_shape"))[0] is not lenet:
            return fail(f"{FLAGS.model_dir} is not a LeNet-family run: its decoder has no switches to probe")
        split = load_split(identity["dataset"], "test", FLAGS.data_dir, limit=FLAGS.examples)
        with threat_model(threat_model_for(identity["dataset"], models.input_shape[-1])):
            x = split.images.astype("float32") / 255.0  # a Split holds uint8 images
            x_adv = craft(FLAGS.attack, models.target, x, split.labels, seed=FLAGS.seed, progress=False)
    except (artifacts.ArtifactError, DataError, ValueError) as e:
        return fail(e)
    decoder = models.student_decoder if FLAGS.decoder == "student" else models.decoder
    batches = [(x[i:i + 500], x_adv[i:i + 500]) for i in range(0, len(x), 500)]
    rows = switches.switch_ablation(models, batches, decoder)
    print(f"{FLAGS.model_dir}: {len(x)} test images, {FLAGS.attack} crafted on the target, decoder "
          f"{'D_s' if FLAGS.decoder == 'student' else 'D_t'} ({models.decoder_unpool})")
    print(switches.format_markdown(rows), end="")
    if FLAGS.out:
        artifacts.write_json_atomic(FLAGS.out, {"model_dir": FLAGS.model_dir, "examples": len(x),
                                                "attack": FLAGS.attack, "decoder": FLAGS.decoder,
                                                "decoder_unpool": models.decoder_unpool, "rows": rows})
    return 0


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
