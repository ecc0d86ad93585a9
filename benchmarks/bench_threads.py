"""A CPU forward with torch's default threads vs as many as the process may use.

torch starts one intra-op thread per physical core it sees; a container's CPU quota
(Docker ``--cpus``, a Kubernetes CPU limit: cgroup CFS bandwidth) does not show there,
so the team can be larger than the CPU time the kernel grants. ``captum-nmf`` (the
command) lowers torch's threads to ``captum_nmf._utils.cpus.usable_cpus()`` (loky's
count, as joblib's: affinity, the quota rounded up, ``LOKY_MAX_CPU_COUNT``). This
measures what that buys, side by side in one process:

* EfficientNet-Lite0 (ImageNet weights, ``captum_nmf.zoo.efficientnet_lite0``), the
  features up to ``head_relu``, on a batch of ``--batch`` real 512 px H&E tiles (crops of
  the two packaged images), ``torch.no_grad``, float32;
* the same forward with ``torch.set_num_threads(default)`` and with
  ``torch.set_num_threads(min(default, usable_cpus()))`` (the command line's rule),
  ``--repeats`` rounds each, alternating which goes first (``median_times``); medians
  and their ratio are printed.

Outside a quota both are the same number of threads and the ratio is about 1. To see a
quota, run it inside one, e.g. ``docker run --cpus 1 ...``, or as root on cgroup v1 (a
cgroup of its own, bind-mounted where joblib reads the quota)::

    mkdir /sys/fs/cgroup/cpu/q && echo 100000 > /sys/fs/cgroup/cpu/q/cpu.cfs_quota_us
    unshare -m sh -c 'mount --bind /sys/fs/cgroup/cpu/q /sys/fs/cgroup/cpu &&
        echo $$ > /sys/fs/cgroup/cpu/cgroup.procs &&
        .venv/bin/python benchmarks/bench_threads.py'
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from _activations import IMAGES, base_parser, load_image, machine_header, median_times, print_table

from captum_nmf import zoo
from captum_nmf._utils.cpus import usable_cpus


def _quota() -> str:
    """The CFS quota as the files say it (what joblib reads), for the header."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    if v2.is_file():
        return f"cpu.max {v2.read_text().strip()}"
    v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    if v1.is_file():
        period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        return f"cfs_quota_us {v1.read_text().strip()} / period {period}"
    return "no cgroup CPU files"


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    size, repeats = (224, 3) if args.small else (512, args.repeats)
    machine_header(
        "bench_threads: Lite0 forward, torch's default threads vs usable_cpus()",
        torch.device("cpu"),
    )
    # as the command line does: never more than torch's default (one per physical core)
    default = torch.get_num_threads()
    usable = min(default, usable_cpus())
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    print(
        f"# os.cpu_count {os.cpu_count()}, affinity {affinity}, {_quota()}, "
        f"usable_cpus {usable_cpus()}, torch default threads {default}"
    )
    images = [load_image(name) for name in IMAGES]
    crops = [
        img[..., y : y + size, x : x + size]
        for img in images
        for y in (0, 476, 988)
        for x in (0, 476, 988)
    ]
    batch = zoo.normalize(torch.cat(crops[: args.batch]))
    net = zoo.efficientnet_lite0().eval()

    def forward(threads: int) -> None:
        torch.set_num_threads(threads)
        with torch.no_grad():
            net.features(batch)

    times = median_times(
        {"default": lambda: forward(default), "usable": lambda: forward(usable)},
        repeats,
        torch.device("cpu"),
    )
    torch.set_num_threads(default)
    n = batch.shape[0]
    print_table(
        ["threads", "median s / batch", "tiles/s"],
        [
            [
                f"torch default ({default})",
                f"{times['default']:.3f}",
                f"{n / times['default']:.2f}",
            ],
            [f"cut to the CPUs ({usable})", f"{times['usable']:.3f}", f"{n / times['usable']:.2f}"],
        ],
    )
    print(f"# default / usable time: {times['default'] / times['usable']:.2f}x")


if __name__ == "__main__":
    main()
