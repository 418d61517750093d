# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the agents' commands (dstack-kms, dstack-gateway, dstack-vmm, dstack-guest-agent) share:
running a parsed subcommand and printing its result or its error."""

import json
import sys

from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError


def run_cli(prog, parser, argv=None):
    """Parse, run args.func, print its JSON result; DstackError -> "PROG: error: ..." and exit code 2."""
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except DstackError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0
