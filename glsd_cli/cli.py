"""The `glsd` command line. Thin: arguments → config → engine call. User errors → one line, exit 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from glsd_cli.errors import GlsdError

app = typer.Typer(
    name="glsd", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Global-local self-distillation (GLSD) and self-distilled SSL (SDSSL) for Vision Transformers: "
         "pre-train, evaluate and export backbones.")
presets_app = typer.Typer(help="List the named recipes and show their resolved configs.", invoke_without_command=True)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")
app.add_typer(data_app, name="data")

_state = {"debug": False}

PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="preset name (see `glsd presets`) or path to a TOML file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override any config key: --set optim.lr=1e-3 (repeatable)")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")]


def _show_version(value: bool) -> None:
    if value:
        from glsd_cli import __version__

        typer.echo(f"glsd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks on errors")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                help="print glsd's version and exit")] = False) -> None:
    _state["debug"] = debug


# --------------------------------------------------------------------------- pretrain
@app.command()
def pretrain(
    preset: PresetOpt = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="training data URI or folder (see `glsd data schemes`)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="training epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="images per step, all processes together")] = None,
    out: Annotated[Optional[str], typer.Option(help="parent folder of run directories (default: runs)")] = None,
    name: Annotated[Optional[str], typer.Option(help="run directory name (default: preset and time)")] = None,
    device: DeviceOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of initialisation and augmentation")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto | fp32 | bf16 | fp16 (autocast)")] = None,
    overrides: SetOpt = None,
    resume: Annotated[Optional[Path], typer.Option(help="continue the run in this directory from its last checkpoint")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Pre-train a ViT by self-distillation. With no arguments: the tiny CPU preset on the built-in data."""
    from glsd_cli.config import DEFAULT_PRESET, resolve
    from glsd_cli.commands.pretrain import pretrain as run_pretrain

    flags = {"data.train": data, "run.epochs": epochs, "data.batch_size": batch_size, "run.out": out,
             "run.name": name, "run.device": device, "run.seed": seed, "run.precision": precision}
    if resume is not None and (preset or any(v is not None for v in flags.values()) or overrides):
        raise GlsdError("--resume continues a run with its saved config; drop the other options")
    cfg = resolve(preset, overrides, flags)
    run_dir = run_pretrain(cfg, preset or DEFAULT_PRESET, resume=resume, quiet=quiet)
    typer.echo(f"run directory: {run_dir}")


# --------------------------------------------------------------------------- commands in their own modules
from glsd_cli.commands import dense_eval as _dense_eval  # noqa: E402
from glsd_cli.commands import export as _export  # noqa: E402
from glsd_cli.commands import finetune as _finetune  # noqa: E402
from glsd_cli.commands import knn_eval as _knn_eval  # noqa: E402
from glsd_cli.commands import linear_eval as _linear_eval  # noqa: E402
from glsd_cli.commands import visualize as _visualize  # noqa: E402

app.command("knn-eval")(_knn_eval.command)
app.command("linear-eval")(_linear_eval.command)
app.command("dense-eval")(_dense_eval.command)
app.command("finetune")(_finetune.command)
app.command("export")(_export.command)
app.add_typer(_visualize.app, name="visualize")


# --------------------------------------------------------------------------- presets
@presets_app.callback()
def presets_list(ctx: typer.Context) -> None:
    """List the presets with one line each."""
    if ctx.invoked_subcommand is not None:
        return
    from glsd_cli.config import DEFAULT_PRESET, list_presets, preset_dict

    for name in list_presets():
        marker = " (default)" if name == DEFAULT_PRESET else ""
        typer.echo(f"{name:<22}{preset_dict(name).get('description', '')}{marker}")


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="preset name or TOML path")],
    overrides: SetOpt = None,
) -> None:
    """Print the resolved config of a preset (defaults + preset + overrides) as TOML-like JSON."""
    from glsd_cli.config import resolve

    typer.echo(resolve(name, overrides).to_json())


# --------------------------------------------------------------------------- data
@data_app.command("info")
def data_info(uri: Annotated[str, typer.Argument(help="dataset URI or folder")],
              split: Annotated[str, typer.Option(help="train | val | unlabelled")] = "train") -> None:
    """Number of images and classes, image size and split of a dataset."""
    from glsd_cli.data.base import same_files
    from glsd_cli.data.sources import open_source

    source = open_source(uri, split)
    info = source.info()
    shown_split = info.split
    if split != "train" and same_files(source, open_source(uri, "train")):
        shown_split += " (the same images as train: a folder without train/ and val/ has no held-out split)"
    typer.echo(f"uri:      {info.uri}\nsplit:    {shown_split}\nimages:   {info.num_images}\n"
               f"classes:  {info.num_classes}" + (f" ({', '.join(info.classes[:10])}"
                                                   f"{', ...' if info.num_classes > 10 else ''})" if info.classes else "")
               + f"\nsize:     {info.image_size} (height x width)")


@data_app.command("schemes")
def data_schemes() -> None:
    """The dataset URI forms glsd understands."""
    from glsd_cli.data.sources import describe_schemes

    typer.echo(describe_schemes())


def _click_exceptions() -> tuple[type[Exception], type[Exception] | None]:
    """(ClickException, NoArgsIsHelpError) of the click that typer runs on: typer 0.26 and later carry
    their own copy (`typer._click`, which raises none of click's own classes), older releases use click."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions.ClickException, getattr(exceptions, "NoArgsIsHelpError", None)


def _usage_line(e: Exception) -> str:
    """A usage error as one line: click's message (with its did-you-mean) and where the help is."""
    ctx = getattr(e, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {e.format_message()}{where}"


def main() -> None:
    click_exception, no_args_is_help = _click_exceptions()
    try:
        # prog_name: `python -m glsd_cli` (what torchrun launches) is `glsd` too, in help and error lines.
        code = app(standalone_mode=False, prog_name="glsd")  # a typer.Exit(code) comes back as its code
    except GlsdError as e:
        if _state["debug"]:
            raise
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except KeyboardInterrupt as e:
        typer.echo(f"interrupted: {e}" if str(e) else "interrupted", err=True)
        sys.exit(130)
    except typer.Abort:
        sys.exit(130)
    except click_exception as e:  # typer's usage errors: unknown option or command, missing or bad value
        if no_args_is_help is not None and isinstance(e, no_args_is_help):
            if e.format_message():  # typer's rich help is printed already; plain click's is the message
                e.show()
        else:
            typer.secho(_usage_line(e), err=True, fg=typer.colors.RED)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
