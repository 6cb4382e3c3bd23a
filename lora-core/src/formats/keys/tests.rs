//! Key spellings of every layout: kohya names, diffusers/PEFT spellings, module lists from weights.

use super::*;

fn linear(path: &str) -> ModuleInfo {
    ModuleInfo {
        path: path.to_string(),
        kind: ModuleKind::Linear,
        in_features: 8,
        out_features: 8,
    }
}

fn lora(component: Component, module: &str, role: Role) -> ParsedKey {
    ParsedKey::Lora {
        component,
        module: module.to_string(),
        role,
    }
}

const TO_Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q";

#[test]
fn locon_modules_add_resnet_and_sampler_convs_only_for_the_merge_set() {
    let conv1 = "down_blocks.0.resnets.0.conv1.weight";
    assert_eq!(
        module_from_weight(Component::Unet, conv1, &[32, 16, 3, 3]),
        None
    );
    let info = locon_module_from_weight(Component::Unet, conv1, &[32, 16, 3, 3]).unwrap();
    assert_eq!(
        (info.kind, info.in_features, info.out_features),
        (ModuleKind::Conv { kh: 3, kw: 3 }, 144, 32)
    );
    for (name, shape, kind) in [
        (
            "down_blocks.0.resnets.0.time_emb_proj.weight",
            vec![32, 64],
            ModuleKind::Linear,
        ),
        (
            "up_blocks.1.resnets.0.conv_shortcut.weight",
            vec![32, 64, 1, 1],
            ModuleKind::Conv1x1,
        ),
        (
            "down_blocks.0.downsamplers.0.conv.weight",
            vec![32, 32, 3, 3],
            ModuleKind::Conv { kh: 3, kw: 3 },
        ),
        (
            "up_blocks.0.upsamplers.0.conv.weight",
            vec![32, 32, 3, 3],
            ModuleKind::Conv { kh: 3, kw: 3 },
        ),
        (
            "mid_block.attentions.0.proj_in.weight",
            vec![32, 32, 1, 1],
            ModuleKind::Conv1x1,
        ),
    ] {
        assert_eq!(
            locon_module_from_weight(Component::Unet, name, &shape).map(|m| m.kind),
            Some(kind),
            "{name}"
        );
    }
    // LyCORIS' full preset: the top-level convs and time-embedding linears.
    assert_eq!(
        locon_module_from_weight(Component::Unet, "conv_in.weight", &[32, 4, 3, 3])
            .map(|m| (m.kind, m.in_features)),
        Some((ModuleKind::Conv { kh: 3, kw: 3 }, 36))
    );
    assert!(
        locon_module_from_weight(Component::Unet, "time_embedding.linear_1.weight", &[64, 32])
            .is_some()
    );
    for name in ["conv_norm_out.weight", "time_embedding.cond_proj.weight"] {
        assert_eq!(
            locon_module_from_weight(Component::Unet, name, &[32, 4, 3, 3]),
            None
        );
    }
    assert_eq!(
        locon_module_from_weight(
            Component::TextEncoder,
            "text_model.embeddings.token_embedding.weight",
            &[100, 32]
        ),
        None
    );
}

#[test]
fn kohya_names_flatten_paths_with_prefix() {
    assert_eq!(
        kohya_name(Component::Unet, TO_Q, false),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    );
    assert_eq!(
        kohya_name(
            Component::TextEncoder,
            "encoder.layers.0.self_attn.q_proj",
            false
        ),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    );
    // SDXL numbers its text encoders.
    assert_eq!(
        kohya_name(Component::TextEncoder, "encoder.layers.0.mlp.fc1", true),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    );
    assert_eq!(
        kohya_name(Component::TextEncoder2, "encoder.layers.0.mlp.fc1", true),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    );
}

#[test]
fn sdxl_kohya_keys_name_both_text_encoders() {
    for (key, component) in [
        (
            "lora_te1_text_model_x.lora_down.weight",
            Component::TextEncoder,
        ),
        (
            "lora_te_text_model_x.lora_down.weight",
            Component::TextEncoder,
        ),
        (
            "lora_te2_text_model_x.lora_down.weight",
            Component::TextEncoder2,
        ),
    ] {
        assert_eq!(
            parse_kohya_key(key),
            ParsedKey::Lora {
                component,
                module: "text_model_x".into(),
                role: Role::Down
            },
            "{key}"
        );
    }
    assert_eq!(
        parse_diffusers_key("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"),
        ParsedKey::Lora {
            component: Component::TextEncoder2,
            module: "text_model.encoder.layers.0.mlp.fc1".into(),
            role: Role::Down
        }
    );
}

/// SDXL's UNet (two layers per block, a plain first block) as kohya names it in LDM terms,
/// checked against the numbering of SDXL single files (`input_blocks.4.1` is `down_blocks.1`'s
/// first transformer model, `output_blocks.2.1` the first up block's upsampler).
#[test]
fn sdxl_unet_modules_are_found_by_their_ldm_names() -> Result<()> {
    let paths = [
        (
            "down_blocks.0.resnets.1.conv1",
            "input_blocks_2_0_in_layers_2",
        ),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks_3_0_op"),
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
            "input_blocks_4_1_transformer_blocks_0_attn2_to_q",
        ),
        (
            "down_blocks.2.attentions.1.proj_in",
            "input_blocks_8_1_proj_in",
        ),
        (
            "down_blocks.1.resnets.0.conv_shortcut",
            "input_blocks_4_0_skip_connection",
        ),
        (
            "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
            "middle_block_1_transformer_blocks_9_ff_net_2",
        ),
        (
            "mid_block.resnets.1.time_emb_proj",
            "middle_block_2_emb_layers_1",
        ),
        (
            "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0",
            "output_blocks_2_1_transformer_blocks_0_attn1_to_out_0",
        ),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks_2_2_conv"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks_5_2_conv"),
        (
            "up_blocks.2.resnets.2.conv2",
            "output_blocks_8_0_out_layers_3",
        ),
    ];
    let mut unet: Vec<ModuleInfo> = paths.iter().map(|(p, _)| linear(p)).collect();
    // The layers per block are read off the down blocks' attentions, which up blocks have
    // attentions off theirs.
    unet.push(linear("down_blocks.1.attentions.1.proj_out"));
    unet.push(linear("up_blocks.1.attentions.0.proj_in"));
    // Up block 2 (SDXL's last) has no attention: its upsampler would be child 1, but it has none.
    let names = KohyaNames::new(&unet, &[], &[])?;
    for (path, ldm) in paths {
        assert_eq!(
            names.lookup(&format!("lora_unet_{ldm}")),
            Some((Component::Unet, path)),
            "{ldm}"
        );
        // The diffusers spelling still resolves.
        assert_eq!(
            names.lookup(&kohya_name(Component::Unet, path, true)),
            Some((Component::Unet, path))
        );
    }
    Ok(())
}

#[test]
fn kohya_lookup_matches_enumerated_modules_only() -> Result<()> {
    let unet = [linear(TO_Q), linear("mid_block.attentions.0.proj_in")];
    let te = [linear("text_model.encoder.layers.0.mlp.fc1")];
    let names = KohyaNames::new(&unet, &te, &[])?;
    assert_eq!(
        names.lookup("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"),
        Some((Component::Unet, TO_Q))
    );
    assert_eq!(
        names.lookup("lora_unet_mid_block_attentions_0_proj_in"),
        Some((Component::Unet, unet[1].path.as_str()))
    );
    // Old files without the `text_model` level resolve to the same module.
    for name in [
        "lora_te_text_model_encoder_layers_0_mlp_fc1",
        "lora_te_encoder_layers_0_mlp_fc1",
    ] {
        assert_eq!(
            names.lookup(name),
            Some((
                Component::TextEncoder,
                "text_model.encoder.layers.0.mlp.fc1"
            ))
        );
    }
    assert_eq!(
        names.lookup("lora_unet_mid_block_attentions_0_proj_out"),
        None
    );
    Ok(())
}

#[test]
fn kohya_index_rejects_names_that_collide_after_flattening() {
    let err = KohyaNames::new(&[linear("a.b_c"), linear("a_b.c")], &[], &[]).unwrap_err();
    assert!(err.to_string().contains("lora_unet_a_b_c"), "{err}");
}

#[test]
fn transformers_5_text_encoder_paths_are_indexed_canonically() -> Result<()> {
    let names = KohyaNames::new(&[], &[linear("encoder.layers.3.self_attn.v_proj")], &[])?;
    assert_eq!(
        names.lookup("lora_te_text_model_encoder_layers_3_self_attn_v_proj"),
        Some((Component::TextEncoder, "encoder.layers.3.self_attn.v_proj"))
    );
    Ok(())
}

#[test]
fn kohya_keys_parse_by_suffix() {
    let name = "down_blocks_0_attentions_0_proj_in";
    assert_eq!(
        parse_kohya_key(&format!("lora_unet_{name}.lora_down.weight")),
        lora(Component::Unet, name, Role::Down)
    );
    assert_eq!(
        parse_kohya_key(&format!("lora_unet_{name}.lora_up.weight")),
        lora(Component::Unet, name, Role::Up)
    );
    assert_eq!(
        parse_kohya_key("lora_te_text_model_x.alpha"),
        lora(Component::TextEncoder, "text_model_x", Role::Alpha)
    );
    assert_eq!(parse_kohya_key("lora_unet_x.something"), ParsedKey::Unknown);
    assert_eq!(
        parse_kohya_key("model.diffusion_model.x.weight"),
        ParsedKey::Unknown
    );
}

#[test]
fn dora_magnitudes_are_read_in_both_layouts() {
    let unet = |module: &str| ParsedKey::Lora {
        component: Component::Unet,
        module: module.to_string(),
        role: Role::Magnitude,
    };
    assert_eq!(
        parse_kohya_key("lora_unet_x_attn2_to_q.dora_scale"),
        unet("x_attn2_to_q")
    );
    for key in [
        "unet.x.attn2.to_q.lora_magnitude_vector",
        "unet.x.attn2.to_q.lora_magnitude_vector.weight",
    ] {
        assert_eq!(parse_diffusers_key(key), unet("x.attn2.to_q"), "{key}");
    }
}

#[test]
fn non_lora_algorithms_are_named() {
    let cases = [
        ("lora_unet_x.hada_w1_a", "LoHa"),
        ("lora_unet_x.lokr_w1", "LoKr"),
        ("lora_unet_x.lora_mid.weight", "lora_mid"),
        ("lora_unet_x.oft_blocks", "OFT"),
        ("lora_unet_x.diff_b", "diff"),
        ("lora_unet_x.a1.weight", "GLoRA"),
    ];
    for (key, algorithm) in cases {
        match parse_kohya_key(key) {
            ParsedKey::Unsupported { what } => {
                assert!(what.contains(algorithm), "{key}: {what}")
            }
            other => panic!("{key}: {other:?}"),
        }
    }
    let cases = [
        (
            "unet.x.attn2.to_q.dora_scale",
            "DoRA in a diffusers file (dora_scale)",
        ),
        ("text_encoder.x.q_proj.hada_w1_a", "LyCORIS LoHa (hada_*)"),
        (
            "unet.x.attn2.to_q.lora_B.bias",
            "PEFT lora_bias (lora_B.bias)",
        ),
    ];
    for (key, what) in cases {
        assert_eq!(
            parse_diffusers_key(key),
            ParsedKey::Unsupported { what },
            "{key}"
        );
    }
}

#[test]
fn every_diffusers_spelling_maps_to_the_module_path() {
    let block = "down_blocks.0.attentions.0.transformer_blocks.0.attn2";
    let unet = |module: &str, role| lora(Component::Unet, module, role);
    let cases = [
        (format!("unet.{TO_Q}.lora_A.weight"), unet(TO_Q, Role::Down)),
        (format!("unet.{TO_Q}.lora_B.weight"), unet(TO_Q, Role::Up)),
        (
            format!("unet.{TO_Q}.lora.down.weight"),
            unet(TO_Q, Role::Down),
        ),
        (format!("unet.{TO_Q}.lora.up.weight"), unet(TO_Q, Role::Up)),
        (format!("unet.{TO_Q}.alpha"), unet(TO_Q, Role::Alpha)),
        (
            format!("unet.{block}.processor.to_q_lora.down.weight"),
            unet(TO_Q, Role::Down),
        ),
        (
            format!("unet.{block}.processor.to_out_lora.up.weight"),
            unet(&format!("{block}.to_out.0"), Role::Up),
        ),
        (
            format!("unet.{block}.to_k_lora.down.weight"),
            unet(&format!("{block}.to_k"), Role::Down),
        ),
    ];
    for (key, expected) in cases {
        assert_eq!(parse_diffusers_key(&key), expected, "{key}");
    }
}

#[test]
fn text_encoder_spellings_map_to_canonical_paths() {
    let attn = "text_model.encoder.layers.0.self_attn";
    let te = |module: String, role| lora(Component::TextEncoder, &module, role);
    let cases = [
        (
            format!("text_encoder.{attn}.q_proj.lora_A.weight"),
            te(format!("{attn}.q_proj"), Role::Down),
        ),
        (
            format!("text_encoder.{attn}.q_proj.lora_linear_layer.up.weight"),
            te(format!("{attn}.q_proj"), Role::Up),
        ),
        (
            format!("text_encoder.{attn}.to_v_lora.down.weight"),
            te(format!("{attn}.v_proj"), Role::Down),
        ),
        (
            format!("text_encoder.{attn}.to_out_lora.up.weight"),
            te(format!("{attn}.out_proj"), Role::Up),
        ),
        // transformers ≥ 5 drops the `text_model` level.
        (
            "text_encoder.encoder.layers.0.mlp.fc2.lora_B.weight".into(),
            te("text_model.encoder.layers.0.mlp.fc2".into(), Role::Up),
        ),
    ];
    for (key, expected) in cases {
        assert_eq!(parse_diffusers_key(&key), expected, "{key}");
    }
}

#[test]
fn unrecognised_diffusers_keys_are_unknown() {
    for key in [
        "unet.conv_in.weight",
        "vae.encoder.lora_A.weight",
        "unet.x.to_q.down.weight",
        "unet.lora_A.weight",
    ] {
        assert_eq!(parse_diffusers_key(key), ParsedKey::Unknown, "{key}");
    }
}

#[test]
fn weights_select_transformer_linears_and_1x1_convs() {
    let proj_in = "down_blocks.0.attentions.0.proj_in.weight";
    let conv = module_from_weight(Component::Unet, proj_in, &[320, 320, 1, 1]).unwrap();
    assert_eq!(
        (conv.kind, conv.in_features, conv.out_features),
        (ModuleKind::Conv1x1, 320, 320)
    );
    let ff = module_from_weight(
        Component::Unet,
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        &[2560, 320],
    )
    .unwrap();
    assert_eq!(
        (ff.path.as_str(), ff.kind, ff.in_features, ff.out_features),
        (
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
            ModuleKind::Linear,
            320,
            2560
        )
    );
    assert!(module_from_weight(
        Component::Unet,
        "down_blocks.0.attentions.0.norm.weight",
        &[320]
    )
    .is_none());
    assert!(module_from_weight(
        Component::Unet,
        "down_blocks.0.resnets.0.time_emb_proj.weight",
        &[320, 1280]
    )
    .is_none());
    assert!(module_from_weight(
        Component::Unet,
        "down_blocks.0.attentions.0.proj_in.bias",
        &[320]
    )
    .is_none());
    let te = module_from_weight(
        Component::TextEncoder,
        "text_model.encoder.layers.0.mlp.fc1.weight",
        &[3072, 768],
    )
    .unwrap();
    assert_eq!(te.kind, ModuleKind::Linear);
    assert!(module_from_weight(
        Component::TextEncoder,
        "text_model.embeddings.token_embedding.weight",
        &[49408, 768]
    )
    .is_none());
}
