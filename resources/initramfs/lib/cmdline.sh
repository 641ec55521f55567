# Kernel command line parsing for Ember's /init (POSIX sh: busybox ash, dash, bash).
# Sourced by /init, and by test-init.sh on the host.

# cmdline_get NAME CMDLINE: prints the value of the last NAME=VALUE in CMDLINE and returns 0,
# or returns 1 if NAME does not appear with a value. Words are split as the kernel does
# (lib/cmdline.c next_arg): at spaces outside double quotes; a value may be quoted,
# NAME="a b c", and the quotes around it are removed. Quotes inside a value are kept.
cmdline_get() {
    _name=$1
    _rest=$2
    _found=1
    _value=
    while :; do
        # Skip leading blanks.
        while :; do
            case $_rest in
                [' 	']*) _rest=${_rest#?} ;;
                *) break ;;
            esac
        done
        [ -n "$_rest" ] || break
        # Take one word: up to a blank outside double quotes.
        _word=
        _inq=0
        while [ -n "$_rest" ]; do
            _c=${_rest%"${_rest#?}"}
            if [ "$_inq" = 0 ]; then
                case $_c in [' 	']) break ;; esac
            fi
            [ "$_c" = '"' ] && _inq=$((1 - _inq))
            _word=$_word$_c
            _rest=${_rest#?}
        done
        # A word quoted as a whole ("NAME=VALUE"): drop the outer quotes.
        case $_word in '"'*) _word=${_word#\"}; _word=${_word%\"} ;; esac
        case $_word in
            "$_name"=*)
                _value=${_word#*=}
                case $_value in '"'*) _value=${_value#\"}; _value=${_value%\"} ;; esac
                _found=0
                ;;
        esac
    done
    [ "$_found" = 0 ] && printf '%s\n' "$_value"
    return $_found
}

# cmdline_mode CMDLINE: sets $mode and $arg to what /init should do (no subshell: every process
# costs here, fork included):
#   mode=test  arg=NAME      ember.test=NAME: run /tests/NAME.sh, then exit with its status
#   mode=cmd   arg=COMMAND   ember.cmd=COMMAND: run `sh -c COMMAND`, then exit with its status
#   mode=shell arg=          neither: an interactive shell on the console, reboot when it exits
#   mode=error arg=MESSAGE   a bad value
# ember.test wins over ember.cmd. A test NAME may only hold letters, digits, '.', '_' and '-',
# and may not start with '.'.
cmdline_mode() {
    arg=
    # cmdline_get sets $_value too; a redirected function call runs in this shell.
    if cmdline_get ember.test "$1" >/dev/null; then
        case $_value in
            '' | *[!A-Za-z0-9._-]* | .*) mode=error arg="bad test name: $_value" ;;
            *) mode=test arg=$_value ;;
        esac
    elif cmdline_get ember.cmd "$1" >/dev/null; then
        if [ -n "$_value" ]; then mode=cmd arg=$_value; else mode=error arg="empty ember.cmd"; fi
    else
        mode=shell
    fi
}
