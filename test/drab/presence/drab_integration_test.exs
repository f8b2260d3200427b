defmodule Drab.Presence.DrabIntegrationTest do
  # Real Drab 0.10 on a real Phoenix endpoint, with real browsers: Drab's own
  # JS (rendered by Drab.Client.run/1) in headless Chromium, driven by
  # test/js/drab_browser.mjs (puppeteer-core). Excluded unless Drab, Phoenix
  # and Plug.Cowboy are on the code path (ERL_LIBS, built outside the repo),
  # and skipped with a message when Chromium or puppeteer-core is missing.
  #
  # The presence config is set here, at run time, as config/runtime.exs would:
  # Drab must have been compiled without it (README, "In a Drab app"). It is
  # `true`, the first line of Drab's own docs, which Drab 0.10 alone turns
  # into an HTTP 500 on every page.
  use ExUnit.Case, async: false

  @moduletag :drab
  @moduletag timeout: 120_000
  @moduletag :capture_log

  @endpoint __MODULE__.Endpoint
  @pubsub __MODULE__.PubSub
  @js_dir Path.expand("../../js", __DIR__)

  if Code.ensure_loaded?(Drab) and Code.ensure_loaded?(Phoenix.Endpoint) and
       Code.ensure_loaded?(Plug.Cowboy) do
    Application.put_env(:drab_presence, @endpoint,
      http: [ip: {127, 0, 0, 1}, port: 0],
      server: true,
      check_origin: false,
      secret_key_base: String.duplicate("drab_presence integration test ", 3),
      pubsub: [name: @pubsub, adapter: Phoenix.PubSub.PG2],
      # Phoenix 1.5+ names its pubsub server here and starts it itself no more.
      pubsub_server: @pubsub
    )

    Application.put_env(:drab, @endpoint,
      otp_app: :drab_presence,
      js_socket_constructor: "window.Phoenix.Socket"
    )

    defmodule UserSocket do
      use Phoenix.Socket
      use Drab.Socket
      def id(_socket), do: nil
    end

    defmodule PageCommander do
      use Drab.Commander, modules: []

      defhandler sub(socket, _sender) do
        Drab.Commander.subscribe(socket, same_topic("room"))
      end

      defhandler unsub(socket, _sender) do
        Drab.Commander.unsubscribe(socket, same_topic("room"))
      end
    end

    defmodule PageController do
      use Phoenix.Controller, namespace: Drab.Presence.DrabIntegrationTest
      use Drab.Controller, commander: Drab.Presence.DrabIntegrationTest.PageCommander

      def index(conn, _params) do
        drab =
          case Drab.Client.run(conn) do
            {:safe, _} = safe -> Phoenix.HTML.safe_to_string(safe)
            js -> js
          end

        html(conn, """
        <!DOCTYPE html>
        <html><head><title>drab</title></head><body>
        <button id="sub" drab-click="sub">sub</button>
        <button id="unsub" drab-click="unsub">unsub</button>
        <script src="/phoenix.js"></script>
        <script>
          window.presenceDiffs = [];
          // Drab's channel, as Drab's JS opens it; Drab.connected hooks run
          // once it has joined.
          window.Drab_connected = false;
        </script>
        #{drab}
        <script>
          Drab.connected.push(function () {
            window.Drab_connected = true;
            Drab.channel.on("presence_diff", function (diff) { window.presenceDiffs.push(diff); });
          });
        </script>
        </body></html>
        """)
      end

      def counts(conn, %{"topic" => topic}) do
        json(conn, %{
          users: Drab.Presence.count_users(topic),
          connections: Drab.Presence.count_connections(topic),
          keys: topic |> Drab.Presence.list() |> Map.keys()
        })
      end

      def topics(conn, _params) do
        json(conn, %{page: Drab.Core.same_path("/"), room: Drab.Core.same_topic("room")})
      end
    end

    defmodule Router do
      use Phoenix.Router

      pipeline :browser do
        plug(:accepts, ["html", "json"])
        plug(:fetch_query_params)
        plug(:fetch_session)
      end

      scope "/" do
        pipe_through(:browser)
        get("/", PageController, :index)
        get("/counts", PageController, :counts)
        get("/topics", PageController, :topics)
      end
    end

    defmodule Endpoint do
      use Phoenix.Endpoint, otp_app: :drab_presence

      socket("/socket", Drab.Presence.DrabIntegrationTest.UserSocket, websocket: true)

      plug(Plug.Static, at: "/", from: {:phoenix, "priv/static"}, only: ~w(phoenix.js favicon.ico))

      plug(Plug.Session,
        store: :cookie,
        key: "_drab_presence_test",
        signing_salt: "drab-presence"
      )

      plug(Drab.Presence.DrabIntegrationTest.Router)
    end
  end

  @compile {:no_warn_undefined, [__MODULE__.Endpoint, Phoenix.PubSub, Drab.Core, :ranch]}

  setup_all do
    Application.put_env(:phoenix, :json_library, Jason)
    # One by one: libraries built with `deps: []` do not list their deps.
    for app <- ~w(telemetry mime plug_crypto plug phoenix_pubsub jason phoenix phoenix_html
                  ranch cowlib cowboy plug_cowboy gettext floki drab)a,
        Application.load(app) in [:ok, {:error, {:already_loaded, app}}],
        do: {:ok, _} = Application.ensure_all_started(app)

    # Run time only, as config/runtime.exs would set it, before the
    # :drab_presence application starts, which mends `true` into what Drab
    # reads (Setup.normalize_config/0, called here as it is at boot).
    Application.put_env(:drab, :presence, true)
    :ok = Drab.Presence.Setup.normalize_config()

    # The suite's global Drab.Presence broadcasts through the built-in
    # registry; this one must go through the endpoint's PubSub, to the page.
    # It is restarted after the run as test_helper.exs started it.
    if Process.whereis(Drab.Presence), do: Supervisor.stop(Drab.Presence)

    # Registered first, so it runs last (after the endpoint below is
    # stopped) and even if starting the endpoint fails: the rest of the
    # suite needs the global module back.
    backend = Drab.PresenceCase.backend()

    on_exit(fn ->
      Application.delete_env(:drab, :presence)
      # Without this endpoint's (stopped) PubSub, as test_helper.exs started
      # it: Drab's config would still name it.
      Application.delete_env(:drab, @endpoint)

      {:ok, presence} =
        Drab.Presence.start_link(diff_window: 20, backend: backend, pubsub_server: nil)

      Process.unlink(presence)
    end)

    # Phoenix 1.4's endpoint starts its PubSub; 1.5+ expects it started.
    pubsub =
      if Code.ensure_loaded?(Phoenix.PubSub) and function_exported?(Phoenix.PubSub, :child_spec, 1),
        do: [{Phoenix.PubSub, name: @pubsub}],
        else: []

    # On the suite's backend: the table keeps the one it was made with.
    presence = {Drab.Presence, backend: backend}
    {:ok, sup} = Supervisor.start_link(pubsub ++ [@endpoint, presence], strategy: :one_for_one)

    Process.unlink(sup)
    on_exit(fn -> Supervisor.stop(sup) end)

    {:ok, port: :ranch.get_port(Module.concat(@endpoint, "HTTP"))}
  end

  test "config `true`: Drab's page renders, served by Phoenix (no HTTP 500)", %{port: port} do
    {:ok, _} = Application.ensure_all_started(:inets)
    url = String.to_charlist("http://127.0.0.1:#{port}/")
    assert {:ok, {{_, 200, _}, _headers, body}} = :httpc.request(:get, {url, []}, [], [])
    # Drab's client script, as Drab.Client.run/1 renders it (the step that
    # read the presence config, and failed on `true`), and the page around it.
    assert to_string(body) =~ "function client_id()"
    assert to_string(body) =~ ~s(drab-click="sub")
  end

  test "Drab's JS in headless Chromium: connect, track, subscribe, unsubscribe, close, diffs",
       %{port: port} do
    chromium = System.get_env("CHROMIUM", "/usr/bin/chromium")

    cond do
      not File.exists?(chromium) ->
        IO.puts("\nSkipping the Drab browser test: no Chromium at #{chromium} (set CHROMIUM=...).")

      not File.dir?(Path.join(@js_dir, "node_modules/puppeteer-core")) ->
        IO.puts("\nSkipping the Drab browser test: run `npm ci` in test/js for puppeteer-core.")

      true ->
        # Streamed, so that the steps show as they pass; the script ends
        # itself after 90 s.
        {_, status} =
          System.cmd("node", ["drab_browser.mjs", "http://127.0.0.1:#{port}", chromium],
            cd: @js_dir,
            stderr_to_stdout: true,
            into: IO.stream(:stdio, :line)
          )

        assert status == 0, "test/js/drab_browser.mjs failed (status #{status})"

        # Every browser is gone: the presences went with their channels.
        page = Drab.Core.same_path("/")
        assert Drab.Presence.count_connections(page) == 0
        assert Drab.Presence.count_connections(Drab.Core.same_topic("room")) == 0
    end
  end
end
