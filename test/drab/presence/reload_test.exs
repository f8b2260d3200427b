defmodule Drab.Presence.ReloadTest do
  # Reloading the NIF module can break, or crash, the VM that does it: each
  # case runs test/fresh_vm/reload.exs in an `elixir` OS process of its own,
  # so the suite's VM is never touched.
  use Drab.PresenceCase, async: false

  # NIF internals: scheduler holds, reloads, clean VMs on the NIF.
  @moduletag :nif_only

  @moduletag timeout: 120_000
  @script Path.expand("../../fresh_vm/reload.exs", __DIR__)

  test "after purge_load of Drab.Presence.Native, the reload is refused and the table works" do
    {output, status} = run_clean_vm(@script, ["purge_load"])
    assert status == 0, "reload.exs purge_load exited with #{status}:\n#{output}"
    assert output =~ "reloading its NIF library is not supported"
    assert output =~ "reload: ok"
  end

  test "after delete_purge_load of Drab.Presence.Native, the new load is refused clearly" do
    {output, status} = run_clean_vm(@script, ["delete_purge_load"])
    assert status == 0, "reload.exs delete_purge_load exited with #{status}:\n#{output}"
    assert output =~ "Restart the VM to load new native code"
    assert output =~ "reload: refused"
  end
end
