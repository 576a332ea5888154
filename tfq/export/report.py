"""The export report: targets it is judged by, and its printed table."""

from __future__ import annotations

# The targets of issue 5 (same model, same run).
INT8_LATENCY_RATIO = 0.30      # int8 median latency / float median latency
INT8_SIZE_RATIO = 0.27         # int8 file / float file
PACKED_SLACK = 0.02            # packed file <= (k/32 + 0.02) * float weight bytes
TOP1_AGREEMENT = 0.999         # k = 2..7
LEVEL_AGREEMENT = 0.9999       # k = 2..7, last quantized activation


def packed_bound(w_bits):
    """Largest packed size allowed, as a fraction of the float32 weight bytes."""
    return min(w_bits, 32) / 32.0 + PACKED_SLACK


def targets(report):
    """{target name: {"value", "limit", "met"}} for the figures the report has."""
    out = {}
    sizes = report.get("sizes", {})
    lat = report.get("latency", {})
    prec = report["model"]

    def add(name, value, limit, at_most):
        if value is None:
            return
        out[name] = {"value": value, "limit": limit,
                     "met": bool(value <= limit if at_most else value >= limit)}

    add("int8_size_ratio", sizes.get("int8_over_float"), INT8_SIZE_RATIO, True)
    add("int8_latency_ratio", lat.get("int8_over_float"), INT8_LATENCY_RATIO, True)
    if "packed_over_float_weights" in sizes:
        add("packed_size_ratio", sizes["packed_over_float_weights"],
            packed_bound(prec["w_bits"]), True)
    agree = report.get("agreement", {})
    k = prec.get("a_bits")
    if "int8" in agree and k is not None and 2 <= k <= 7 and prec.get("w_bits", 32) <= 7:
        add("int8_top1_agreement", agree["int8"].get("top1_agreement"), TOP1_AGREEMENT, False)
        add("int8_same_level", agree["int8"].get("same_level"), LEVEL_AGREEMENT, False)
    return out


def _mb(n):
    return f"{n / 1e6:.3f} MB" if n is not None else "-"


def _pct(x):
    return f"{100 * x:.3f}%" if x is not None else "-"


def format_table(report):
    """The report as aligned text lines (what the CLI prints)."""
    m = report["model"]
    rows = [f"tfq export: {m['name']} ({m['precision']}, input {tuple(m['input_shape'])})"]
    sizes = report.get("sizes", {})
    lat = report.get("latency", {})
    rows.append("")
    rows.append(f"{'':24s}{'float':>14s}{'int8':>14s}{'packed':>14s}")
    rows.append(f"{'file size':24s}{_mb(sizes.get('float_bytes')):>14s}"
                f"{_mb(sizes.get('int8_bytes')):>14s}{_mb(sizes.get('packed_bytes')):>14s}")
    ratios = [sizes.get("int8_over_float"), sizes.get("packed_over_float_weights")]
    rows.append(f"{'size ratio':24s}{'1.000':>14s}"
                + "".join(f"{r:>14.3f}" if r is not None else f"{'-':>14s}" for r in ratios))
    for stat in ("median_ms", "mean_ms", "std_ms", "min_ms"):
        vals = [lat.get(k, {}).get(stat) for k in ("float", "int8")]
        if all(v is None for v in vals):
            continue
        rows.append(f"{'latency ' + stat[:-3] + ' (ms)':24s}"
                    + "".join(f"{v:>14.3f}" if v is not None else f"{'-':>14s}" for v in vals))
    if lat:
        any_lat = lat.get("float") or lat.get("int8") or {}
        rows.append(f"{'latency runs':24s}{any_lat.get('runs', '-')!s:>14s} "
                    f"(warm-up {any_lat.get('warmup', '-')}, threads {any_lat.get('threads', '-')},"
                    f" int8/float {lat.get('int8_over_float', float('nan')):.3f})")
    agree = report.get("agreement")
    if agree:
        rows.append("")
        rows.append(f"agreement with Keras on {agree['examples']} examples"
                    + (f" (Keras top-1 accuracy {_pct(agree.get('keras_top1_accuracy'))})"
                       if "keras_top1_accuracy" in agree else ""))
        last = agree.get("last_quantized_activation")
        for kind in ("float", "int8"):
            if kind not in agree:
                continue
            e = agree[kind]
            line = f"  {kind:6s} top-1 {_pct(e['top1_agreement'])}"
            if "same_level" in e:
                line += (f", same {last['bits']}-bit level on {_pct(e['same_level'])} of "
                         f"{last['values']} values of {last['layer']}")
            if "top1_accuracy" in e:
                line += f", top-1 accuracy {_pct(e['top1_accuracy'])}"
            rows.append(line)
    info = report.get("int8")
    if info:
        convs = [layer for layer in info["layers"] if layer["op"] == "CONV_2D"]
        exact = sum(1 for layer in convs if layer["exact"])
        rows.append("")
        rows.append(f"int8 construction: {exact}/{len(convs)} conv layers give exactly the k-bit "
                    f"levels; I/O {info['io_dtype']}, input scale "
                    f"{info['input']['scale']:.6g} zero point {info['input']['zero_point']}")
        for layer in convs:
            if 0 < layer["exact_channels_xnnpack"] < layer["channels"]:
                rows.append(f"  {layer['name']}: {layer['exact_channels_xnnpack']}/"
                            f"{layer['channels']} channels exact")
        for note in info.get("notes", []):
            rows.append(f"  note: {note}")
    tgt = report.get("targets")
    if tgt:
        rows.append("")
        rows.append("targets:")
        for name, t in tgt.items():
            rows.append(f"  {name:24s} {t['value']:.4f} (limit {t['limit']:.4f}): "
                        f"{'met' if t['met'] else 'NOT met'}")
    etpu = report.get("edgetpu")
    if etpu is not None:
        rows.append("")
        if "table" in etpu:
            rows.append(etpu["table"])
        else:
            rows.append(f"Edge TPU check: {etpu.get('skipped', 'not run')}")
    files = report.get("files", {})
    if files:
        rows.append("")
        rows.extend(f"wrote {path}" for path in files.values())
    return "\n".join(rows)
