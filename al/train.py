"""Training CLI for the AL models and their backprop baselines.

    python -m al.train --model lstm --method al --train-file train.tsv --test-file test.tsv
    python -m al.train --model lstm --method al --arch seed --preset rotten_tomatoes --dataset rotten_tomatoes
    python -m al.train --model cnn --method bp --dataset mnist --epochs 2 --device cuda --results out.json

``--dataset`` takes mnist, a listed name (``$MEPROP_DATA/text/NAME`` when present, otherwise Hugging Face;
``--hf`` forces that) or a path (saved HF dataset, GLUE SST-2 folder, TSV folder, CSV/JSON/parquet,
IMDB_Dataset.csv). Every epoch ends with an evaluation (validation split if there is one, else test); with a
validation split the test uses the best validation epoch's model. Checkpoints (``--checkpoint``) are written
atomically after each epoch and ``--resume`` continues from one. The test accuracy is printed and, with
``--results FILE``, written as JSON (``test_accuracy``, a fraction).
"""

from __future__ import annotations

import argparse

from .cli import add_common_arguments, add_device_arguments, check_common_arguments, parse_with_preset
from .config import TrainConfig
from .training import fit, resolve_device


def parse_args(argv=None) -> TrainConfig:
    """The command line as a :class:`~al.config.TrainConfig` (``SystemExit`` with a message on bad options)."""
    p = argparse.ArgumentParser(prog="python -m al.train", description=__doc__.split("\n\n")[0])
    opt = add_common_arguments(p)
    p.add_argument("--method", required=True, choices=("al", "bp"), help="associated learning or backprop")
    add_device_arguments(opt)
    opt.add_argument("--threads", type=int, help="torch.set_num_threads")
    opt.add_argument("--exit-threshold", type=float, help="AL: also test adaptive early exit at this entropy")
    opt.add_argument("--checkpoint", help="checkpoint file written after every epoch")
    opt.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    opt.add_argument("--results", help="write a JSON summary here")
    opt.add_argument("--glue-sst2", help="write GLUE SST-2 predictions (GLUE's test sentences when the data has "
                                         "them: a GLUE folder or --hf sst2; else the test split) by the model "
                                         "of the best validation epoch")
    args = parse_with_preset(p, argv)
    check_common_arguments(p, args)
    if args.method == "bp" and args.exit_threshold is not None:
        p.error("--exit-threshold applies to --method al")
    try:
        resolve_device(args.device, args.amp)
    except ValueError as error:
        p.error(str(error))
    return TrainConfig.from_namespace(args)


def main(argv=None) -> dict:
    return fit(parse_args(argv))


if __name__ == "__main__":
    main()
