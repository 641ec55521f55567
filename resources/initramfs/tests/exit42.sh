# Exits with 42: the VM's exit status must be 42.
echo "EMBER-TEST exiting with 42"
exit 42
