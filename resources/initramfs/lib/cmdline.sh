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

# cmdline_mode CMDLINE: prints what /init should do, as "MODE ARGUMENT":
#   "test NAME"   ember.test=NAME: run /tests/NAME.sh, then exit with its status
#   "cmd COMMAND" ember.cmd=COMMAND: run `sh -c COMMAND`, then exit with its status
#   "shell"       neither: an interactive shell on the console, reboot when it exits
# ember.test wins over ember.cmd. A test NAME may only hold letters, digits, '.', '_' and '-'
# (mode "error MESSAGE" otherwise).
cmdline_mode() {
    if _t=$(cmdline_get ember.test "$1"); then
        case $_t in
            '' | *[!A-Za-z0-9._-]* | .*) printf 'error bad test name: %s\n' "$_t" ;;
            *) printf 'test %s\n' "$_t" ;;
        esac
    elif _t=$(cmdline_get ember.cmd "$1"); then
        if [ -n "$_t" ]; then printf 'cmd %s\n' "$_t"; else echo "error empty ember.cmd"; fi
    else
        echo shell
    fi
}
