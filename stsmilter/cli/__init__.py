"""The `stsmilter` command: run, query, check, check-config, import-config, cache list|purge.

This module is the parser and main(); the subcommands live beside it (lookup.py: query,
check, check-config; cache.py: cache list, cache purge; import_config.py: import-config;
common.py: what they share).

Exit status: 0 when the command could answer, 2 for usage and configuration errors
(one line on stderr), 1 for anything else that went wrong, 141 (128 + SIGPIPE, quietly)
when the reader of the output went away, as in `stsmilter cache list | head -1`.

Run as root, the commands that use the cache or the network first become [daemon] user,
exactly as `run` does (preflight.py), so a cache file is never created root-owned.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from stsmilter import __version__, config as config_mod
from stsmilter.cli.cache import cmd_cache_list, cmd_cache_purge
from stsmilter.cli.common import EXIT_ERROR, EXIT_PIPE, EXIT_USAGE, CommandError, UsageError
from stsmilter.cli.lookup import cmd_check, cmd_check_config, cmd_query, result_as_dict  # noqa: F401 (query --json)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other usage error
        command = self.prog.partition(" ")[2]  # "stsmilter cache purge" -> "cache purge"
        raise UsageError(f"{command}: {message}" if command else message)


def _cmd_import_config(args) -> int:
    from stsmilter.cli.import_config import cmd_import_config  # PyYAML: imported by this command only

    return cmd_import_config(args)


def cmd_run(args) -> int:
    from stsmilter.service import daemon

    return daemon.run(args.config)


CONFIG_HELP = f"configuration file (default {config_mod.DEFAULT_CONFIG_PATH})"


def _add_config_option(parser: argparse.ArgumentParser, default) -> None:
    # Accepted before the command ("stsmilter -c FILE query ...") and after it. The
    # commands' copy defaults to SUPPRESS so that it does not overwrite the global one.
    parser.add_argument("-c", "--config", metavar="FILE", default=default, help=CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stsmilter", description="MTA-STS (RFC 8461) milter and TLS-policy socketmap")
    parser.add_argument("--version", action="version", version=f"stsmilter {__version__}")
    _add_config_option(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(subparsers, name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        _add_config_option(p, argparse.SUPPRESS)
        p.set_defaults(func=func)
        return p

    command(sub, "run", cmd_run, "run the milter, the socketmap and the metrics endpoint in the foreground")
    p = command(sub, "query", cmd_query, "show the MTA-STS policy that applies to a domain")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-cache", action="store_true", help="ignore the persistent cache (memory only)")
    p.add_argument("domain", metavar="DOMAIN", help="the recipient domain, e.g. example.com")
    p = command(sub, "check", cmd_check, "show the milter's decision for recipients of an in-scope sender")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per recipient")
    p.add_argument("--no-cache", action="store_true", help="ignore the persistent cache (memory only)")
    p.add_argument("addresses", metavar="ADDRESS", nargs="+", help="recipient addresses, e.g. user@example.com")
    p = command(sub, "check-config", cmd_check_config, "validate a configuration file and print the effective values")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing for a valid file (exit status only)")
    p = sub.add_parser("import-config", help="print a postfix-mta-sts-resolver configuration as a stsmilter.conf",
                       description="print a postfix-mta-sts-resolver configuration (mta-sts-daemon.yml) as an"
                                   " equivalent stsmilter.conf")
    p.set_defaults(func=_cmd_import_config)
    p.add_argument("--listen", metavar="ADDRESS", help="[socketmap] listen to write instead of the file's"
                                                        " host/port/path, e.g. inet:127.0.0.1:8462")
    p.add_argument("file", metavar="FILE.yml", help="e.g. /etc/mta-sts-daemon.yml")
    cache = sub.add_parser("cache", help="inspect or purge the policy cache", description="inspect or purge the policy cache")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION", parser_class=_Parser)
    cache_sub.required = True
    p = command(cache_sub, "list", cmd_cache_list, "list cached policies")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per policy")
    p = command(cache_sub, "purge", cmd_cache_purge, "remove cached policies")
    p.add_argument("--all", action="store_true", help="remove every cached policy")
    p.add_argument("domains", metavar="DOMAIN", nargs="*", help="domains whose cached policy to remove")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from stsmilter.service.preflight import StartupError

    try:
        try:
            args = build_parser().parse_args(argv)
            status = args.func(args)
        except SystemExit as e:  # --help, --version
            status = e.code or 0
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly, like a tool killed by SIGPIPE.
        # stdout now points at /dev/null so that the final flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE
    except UsageError as e:
        print(f"stsmilter: {e}", file=sys.stderr)
        return EXIT_USAGE
    except config_mod.ConfigError as e:
        print(f"stsmilter: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as e:
        print(f"stsmilter: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as e:
        print(f"stsmilter: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
    except OSError as e:
        print(f"stsmilter: {e}", file=sys.stderr)
        return EXIT_ERROR
